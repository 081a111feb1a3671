"""Speed benchmarks: ``python -m experiments.benchmarks.<name>`` (see BENCHMARKS.md).

``bench_optimizer`` (one optimizer update), ``bench_model`` (model forward+backward, MFU),
``bench_train`` (the trainer's whole step) and ``accelerator`` (all of them on the machine it
finds, with the PyTorch peer, into one JSON and markdown report). ``profile_summary`` (where a
profiled call's device time went), ``hlo_stats`` (what the compiler made of a step: kernels,
bytes moved, cuDNN attention, donation) and ``aot_gpu`` (the same for an H100, compiled on a
machine without one).
"""
