"""Experiments that reproduce each method's central claim, and the ``hypergrad`` harness.

Experiments import the library; the library never imports experiments.
"""
