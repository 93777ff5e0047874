"""Experiment configs, one file per experiment (README, "Configs").

A package so that a config file can build on another (`from configs import
default`) however it is loaded: by path through --config, or imported.
"""
