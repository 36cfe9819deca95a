"""Pipeline stages, one module each, every one exposing ``run(cfg)`` and ``python -m smaf.stages.<name>``:

``train_cls`` (stage 0) -> ``gen_fusion`` (stage 1) -> ``train_fusion`` (stage 2) -> ``gen_pm`` (stage 3)
-> ``crf`` (dense CRF over saved masks, its own step).

Stages are leaves: none imports another; they share the core (:mod:`smaf.runtime`, :mod:`smaf.engine`,
:mod:`smaf.cam`, :mod:`smaf.refine`, :mod:`smaf.evaluate`, :mod:`smaf.run_layout`, models and data)."""
