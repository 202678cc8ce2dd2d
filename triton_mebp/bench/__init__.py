"""The benchmark suite: the timing/CSV harness, the sweep, its LSTM section and the charts.

It times the library's own functions; the library never imports it.
"""
