"""backend: together: the training runs at Together AI's fine-tuning API.

One folder: ``client.py`` (the Together SDK behind one class: create-or-adopt, retrieve, events,
cancel, download; errors as reasons), ``builders.py`` (the upload and download Jobs),
``status.py`` (the pure reducer: observed Jobs and Together job -> status, children and calls),
``handlers.py`` (kopf glue: observe, the calls, a poll timer, the cancel on delete) and ``pod.py``
(what runs in the upload/download pods: ``python -m tuneop.backends.together.pod``).
"""
