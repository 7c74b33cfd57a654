"""The task machinery: the queue, the runner, the worker loop, wake-ups, housekeeping."""
