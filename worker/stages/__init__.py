"""The three stage cores (LLM, Flow, HiFT) and the typed messages between them.

Each core owns its per-request state and turns input messages into output messages with
``handle(msg)`` (consume) and ``step()`` (do one unit of work); neither blocks. Two drivers
run them: :class:`worker.engine.Engine` calls them in turn in one process, the service runs
each in its own process behind ZeroMQ sockets (:mod:`worker.stages.process`).
"""
