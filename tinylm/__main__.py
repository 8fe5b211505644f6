from tinylm.cli import entry

entry()
