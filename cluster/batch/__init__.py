"""Batch work: the input and output files (`format`), the job actor (`jobs`), the Batch
API's service (`service`) and the client that submits jobs (`client`)."""
