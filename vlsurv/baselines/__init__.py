"""The paper's Table-2 baselines (CoxPH, DeepSurv and DeepHit on clinical text, image, or both) and the
comparison table beside the VLM.

``features`` builds the inputs (covariate design, clinical-sentence embeddings, pooled image tokens),
``models`` fits CoxPH and the MLPs, ``run`` is ``vlsurv baselines``, ``table`` is ``vlsurv table``.
"""
