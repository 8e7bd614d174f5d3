from .engine.module import *  # noqa: F401,F403  (moved; old path kept while the layout changes)
