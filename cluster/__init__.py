"""Everything above one device: one subpackage per layer, imports pointing down only:
`cli` -> `front` (HTTP) -> `batch` -> `client` (text, in a front's process) -> `runtime`
(Ray) -> `engine` (tokens, no Ray)."""
