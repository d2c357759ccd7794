"""Tallyflow integration module for Tryton 8.2.

Classes are registered in ``tryton.cfg`` (section ``[register]``); since Tryton 8.0 a
``register()`` function in ``__init__.py`` still works but is deprecated.
"""
