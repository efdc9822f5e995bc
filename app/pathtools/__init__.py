"""Path tools: see what the network path between the service and a user does to a stream.

``probe`` measures a path, ``watch`` prints a job's events with their lag, ``proxy``
emulates a buffering proxy, ``delivery`` computes the lag and burst statistics.
"""
