"""ComfyUI backend adapter: ``type: comfyui`` (see docs/comfyui.md).

Modules, each one concept: ``config`` (the block), ``workflows`` (templates and bindings),
``client`` (the wire protocol), ``failures`` (error sentences), ``backend`` (a job's life).
"""

from imagen_worker.backends.comfyui.backend import ComfyUIBackend

__all__ = ["ComfyUIBackend"]
