from smapctl.cli import entry

entry()
