"""Pipeline stages, one module each, every one exposing ``run(cfg)`` and ``python -m smaf.stages.<name>``:

``train_cls`` (stage 0) -> ``gen_fusion`` (stage 1) -> ``train_fusion`` (stage 2) -> ``gen_pm`` (stage 3)
-> ``crf`` (dense CRF over saved masks, its own step)."""
