"""What the commands run, beside the trainers (as ``trl/scripts``): the training script (:mod:`.train`), the pipeline
engine (:mod:`.pipeline`), the bodies of ``eval``, ``label-tokens``, ``quickstart`` and ``select-mask``, the shipped
recipes (:mod:`.recipes`), every output's guard (:mod:`.outputs`: apart from the inputs, locked) and what they share
(:mod:`.utils`: model and dataset names, splits, outputs).

Below :mod:`hf_align.cli`, which parses and dispatches, and above core: core never imports it, it never imports the
command line; like the command line it may use the testbed (``testbed`` model and ``testbed:*`` dataset names).
"""
