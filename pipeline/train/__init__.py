"""Distributed training helpers shared by train_vqgan and train_transformer.

``config``: the training knobs every trainer shares; ``schedule``: learning-rate schedules;
``state``: the TrainState saved with every checkpoint; ``engine``: DeepSpeed config and engines;
``checkpoint``: save/restore through Ray Train; ``launch``: running a loop under a TorchTrainer.
Heavy imports (ray, deepspeed) happen inside functions.
"""
