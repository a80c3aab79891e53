from backupd import cli

cli.entry()
