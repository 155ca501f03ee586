from slora_jax.cli import main

raise SystemExit(main())
