"""Run a real `tritonserver` for this model repository, here or in the container, and keep it serving.

- `install`: where tritonserver lives and what its python backend needs (backend folder, stub Python, env);
- `server`: one tritonserver child process (command line, start, graceful stop, kill, cleanup);
- `shm`: its shared-memory regions in /dev/shm, named so the launcher removes only its own;
- `processes`, `probes`: what /proc and the server's HTTP endpoints say about its health;
- `supervisor`: restarts the server when it or a python backend stub dies;
- `gateway`: the optional OpenAI/TGI gateway child;
- `health`: `python -m multilora.launcher.health`, the probe for Docker and Kubernetes;
- `__main__`: `python -m multilora.launcher`, the command line (`make serve`, the container).

Only the standard library is used, so the package stays importable without Triton.
"""
from multilora.launcher.install import TritonInstall, find_tritonserver
from multilora.launcher.server import Endpoints, ServerStartError, TritonServer, free_port, free_ports

__all__ = ["Endpoints", "ServerStartError", "TritonInstall", "TritonServer", "find_tritonserver", "free_port",
           "free_ports"]
