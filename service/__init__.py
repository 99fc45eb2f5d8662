"""LowDiff Serve's HTTP microservice: ``create_app`` builds it, ``lowdiff serve`` runs it."""

from service.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so that ``lowdiff --help`` does not import FastAPI.
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(name)
