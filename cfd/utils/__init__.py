"""Small shared helpers: media files, seeding, atomic writes, process tuning."""
