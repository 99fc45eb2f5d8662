"""LowDiff Serve's HTTP microservice: :func:`lowdiff.service.app.create_app` builds it, ``lowdiff serve`` runs it
(:mod:`lowdiff.service.server`). FastAPI is imported only by those modules, so ``lowdiff --help`` stays quick."""
