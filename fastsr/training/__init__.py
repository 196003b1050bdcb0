"""The parts of SRGAN training; :mod:`fastsr.train` is the recipe that puts them together.

* :mod:`.config` - :class:`~.config.TrainConfig` (its fields are the ``fastsr train`` options)
* :mod:`.trainer` - models, optimizers and one step (:class:`~.trainer.Trainer`), EMA, schedule
* :mod:`.checkpoint` - ``checkpoint.pt``: save, exact resume, exported model files
* :mod:`.loggers` - the metric-logger interface and its sinks (CSV, TensorBoard, progress bar)

The process group is :mod:`fastsr.distributed`; ``SyncBatchNorm2d`` is in :mod:`fastsr.nn`.
"""
