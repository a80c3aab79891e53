from backupd import cli

raise SystemExit(cli.main())
