"""In-process fakes of the services the worker talks to, faithful to their protocols."""
