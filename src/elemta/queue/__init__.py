"""The durable delivery queue: on-disk records, their schedule, and the manager that delivers.

Layers: `routing` and `policy` are pure decisions; `store` is the on-disk layout (blocking, run
on an executor); `manager` runs deliveries on the event loop. Nothing here imports smtp/.
"""
