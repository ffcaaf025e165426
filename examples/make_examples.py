"""Writes the example inputs README's RelaxFlow and refine commands use: a held-out chair
(``chair/1000004``, never trained on) seen from the embedded configs' observation camera
(elevation 20, azimuth 0, fov 40, 256 px; distance 2.5 in the world, 1.5625 in the generator's
box), its upper part cut away, so that what remains (a seat on legs) could be a chair, a stool, a
table or a bench and the prompt decides.

    python examples/make_examples.py     (rewrites examples/chair_occluded*.png)
"""

from pathlib import Path

from PIL import Image

from cfd.evaluation.amodal import AmodalCase, observe

HERE = Path(__file__).resolve().parent
CASE = AmodalCase(case_id="readme-chair", category="chair", seed=1_000_004, elevation=20.0,
                  azimuth=0.0, distance=2.5, fov=40.0, resolution=256, occluder="cut",
                  occluder_params=(-90.0, 8.0), band="", hidden_share=0.0, visible_parts=(),
                  ambiguous_with=())

if __name__ == "__main__":
    rgba, visible, _ = observe(CASE)
    Image.fromarray(rgba, "RGBA").save(HERE / "chair_occluded.png")
    Image.fromarray(visible, "L").save(HERE / "chair_occluded_mask.png")
