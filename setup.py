"""Packaging is declared in setup.cfg; this file lets older tools build it."""

from setuptools import setup

setup()
