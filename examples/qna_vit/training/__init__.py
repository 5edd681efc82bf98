"""Training machinery behind ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py``.

* :mod:`qna_vit.training.data`: the generated dataset, an ImageFolder reader, the transforms (timm's when it is
  importable, a self-contained torch version otherwise) and a sampler whose data order is a pure
  function of ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
* :mod:`qna_vit.training.mixup`: mixup/cutmix with label smoothing and the matching losses.
* :mod:`qna_vit.training.checkpoint`: atomic checkpoint files and the training state they hold.
* :mod:`qna_vit.training.distributed`: ``torchrun``/``env://`` process groups and small collectives.
* :mod:`qna_vit.training.engine`: the schedule, EMA, metrics, logging and the train/eval loops.
* :mod:`qna_vit.training.train_cli`, :mod:`~qna_vit.training.eval_cli`, :mod:`~qna_vit.training.demo`: the
  command lines of ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py`` (each script calls
  its module's entry point).
"""
