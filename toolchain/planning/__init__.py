"""Planning: a recipe becomes a plan of steps with content keys, before anything loads. The stage
kinds (their parameters, plan-time rules and the facts each artifact will have), shapes, default
tolerances and the code hashes that go into keys. Each stage's `run` hands over to
`execution.runtime`, imported only when the stage runs."""
