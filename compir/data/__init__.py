"""Dataset formats (CIRR, FashionIQ, Shoes, and compir's synthetic benchmark in the CIRR layout).

Torch-free. Entry points:

- :func:`compir.data.load.load_split` ``(root, *, split, fmt="auto", check=False) -> CirSplit``
- :func:`compir.data.files.check_images` ``(split) -> list[ImageProblem]`` (every bad image)
- :func:`compir.data.synth_write.write_synthetic` (``compir data synth``) and, for on-the-fly
  training, :func:`compir.data.synth.sample_train_query`, :func:`compir.data.synth_scene.render_scene`,
  :func:`compir.data.synth_scene.scene_caption`, :func:`compir.data.synthetic.synth_config_of`
- :func:`compir.data.submission.write_cirr_submission` (CIRR test server files)
- metrics live in :mod:`compir.metrics` (``evaluate_split``)
"""
