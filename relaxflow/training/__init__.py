"""Training a TRELLIS-architecture generator on the procedural shape world (``cfd.shapes``
categories), at sizes a CPU can train.

* :mod:`.data`: the cached dataset (occupancy grids and conditioning renders per category and
  seed, train and held-out splits by seed), and the caching both stages' datasets share;
* :mod:`.slat_data`: stage 2's cached dataset (voxels, their features from the ground-truth
  splats, multi-view renders with their cameras in the generator's box);
* :mod:`.sizes`: the models' sizes, as the released classes' arguments, their training
  initialisation and the tiny DINOv2-with-registers conditioner;
* :mod:`.structure`: stage 1 (the sparse structure): the VAE's and the flow's losses, the
  resumable trainer, held-out metrics and the export to a released-layout pipeline folder;
* :mod:`.slat`: stage 2 (the structured latent): the SLat VAE trained through renders, the
  latent flow on the frozen stage-1 conditioner, their trainer (stage 1's interface), held-out
  PSNR and mask IoU, and the export completing a stage-1 pipeline folder;
* :mod:`.plots`: the loss curves.

The ``train-generator`` job (``jobs/train_generator.py``) runs them; nothing here imports a job.
"""
