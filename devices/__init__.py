"""Ophyd devices over any pymmcore-plus ``CMMCorePlus``."""
