"""Speed benchmarks: ``python -m experiments.benchmarks.<name>`` (see BENCHMARKS.md).

``bench_optimizer`` (one optimizer update), ``bench_model`` (model forward+backward, MFU),
``bench_train`` (the trainer's whole step) and ``accelerator`` (all of them on the machine it
finds, with the PyTorch peer, into one JSON and markdown report).
"""
