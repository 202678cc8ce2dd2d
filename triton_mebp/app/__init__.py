"""The ``mebp`` command-line application: demo, train, the tagging task, data loaders, reports.

It uses the library (``triton_mebp``); the library never imports it.
"""
