"""Systems: the loops that tie config, scene, renderer and losses together, one module each."""
