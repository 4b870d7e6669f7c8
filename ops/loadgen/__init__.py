"""Load generator of `lmgate bench serve`: pure pieces (schedule, dataset, metrics)
and the I/O around them (backends, metrics scraper, runner, report).

Names of the reported figures follow `vllm bench serve` so results compare at a glance.
"""
