"""uvicorn serving the gateway, with the app's drain started by the signal that stops it.

uvicorn alone, on SIGTERM or Ctrl-C, stops accepting connections and waits for the open ones
(`timeout_graceful_shutdown`), then cancels what still runs: a stream would just stop. Here the
signal also starts the app's `Drain`, whose deadline cuts each running answer with an error in
its API's shape first; uvicorn's own timeout is that deadline plus a little, to write those errors.
"""
from __future__ import annotations

from types import FrameType

import uvicorn
from fastapi import FastAPI

ERROR_WRITE_S = 5.0  # after the drain deadline, for the cut answers' error events


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.drain = app.state.drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    drain_timeout = app.state.drain.timeout_s
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + ERROR_WRITE_S)
    DrainingServer(config, app).run()
