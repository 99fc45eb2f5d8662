"""One module per command, each with ``register(sub)`` adding its parser; the root (:mod:`lowdiff.cli`)
registers them in this order. A new command: a module here and one line below."""

from __future__ import annotations

from lowdiff.cli.commands import (
    autoencoder,
    bench,
    evaluate,
    export,
    import_edm,
    import_lightningdit,
    models,
    sample,
    serve,
    train,
)

COMMANDS = (
    models.register,
    sample.register,
    train.register,
    train.register_export_ema,
    autoencoder.register,
    autoencoder.register_encode_latents,
    evaluate.register,
    evaluate.register_train_classifier,
    export.register,
    import_edm.register,
    import_lightningdit.register,
    bench.register,
    serve.register,
)
