from cachemedicpp.bench import main

raise SystemExit(main())
