"""What a command runs, beside the trainers (as ``trl/scripts``): the pipeline engine and the training script.

Below :mod:`hf_align.cli` (which parses and dispatches) and above core: core never imports it, it never imports the
command line.
"""
