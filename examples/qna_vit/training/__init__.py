"""Training machinery behind ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py``, built on
timm's (transforms, mixup/cutmix, optimizer factory, scheduler, model EMA); what timm lacks is here.

* :mod:`qna_vit.training.data`: the generated dataset, the ImageFolder and tar-shard readers (unreadable
  images reported, replaced from the sample's seed and counted), timm's transforms, and a sampler whose
  data order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches an
  uninterrupted one would.
* :mod:`qna_vit.training.mixup`: timm's mixup/cutmix under a per-step seed, and the losses.
* :mod:`qna_vit.training.checkpoint`: atomic checkpoint files, their history and the newest readable one.
* :mod:`qna_vit.training.preemption`: SIGTERM/SIGUSR1/SIGINT finish the step, save and exit, every rank
  at the same step.
* :mod:`qna_vit.training.distributed`: ``torchrun``/``env://`` process groups and small collectives.
* :mod:`qna_vit.training.engine`: the optimizer and schedule (timm's), evaluation and logging.
* :mod:`qna_vit.training.train_cli`, :mod:`~qna_vit.training.eval_cli`, :mod:`~qna_vit.training.demo`: the
  command lines of ``examples/train.py``, ``examples/eval.py`` and ``examples/demo.py`` (each script calls
  its module's entry point).
"""
