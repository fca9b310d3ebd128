"""mra-serve on Ray Serve (imported only with ``--ray``): the deployments (vision, LLM engine,
ingress) and the Ray instance they run on."""

from .deployments import APP_NAME, build_ray_app
from .instance import RayServer

__all__ = ["APP_NAME", "RayServer", "build_ray_app"]
