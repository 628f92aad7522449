"""Rendering for fastland (installed as ``fastland.viz``); PyVista is imported lazily."""
