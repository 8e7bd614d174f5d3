from .engine.routing import *  # noqa: F401,F403  (moved; old path kept while the layout changes)
