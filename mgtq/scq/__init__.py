"""SCQ (secondary calibration quantization, arXiv 2411.10781 §4.1), laid out along its flow.

    recipe.py      the recipe: validated, frozen dataclasses, one per section
    run.py         the run folder: stage folders and file names, fingerprints, lock, recipe kept
    stages.py      the four stages as the list `calibrate` walks (each calls one algorithm module)
    calibrate.py   `mgtq calibrate`: walk the stages, skip the complete ones, resume the rest
    synthesis.py   1. prompt sources; the float model synthesizes its calibration set
    qat.py         2. W4 quantization-aware training (on mgtq.training.loop)
    magnitudes.py  3. per-layer input-activation magnitudes
    secondary.py   4. the A8 layer set and its static input scales
    quantize.py    a finished run → the real W4/W4A8 transformer and its manifest (for `mgtq export`)
"""
