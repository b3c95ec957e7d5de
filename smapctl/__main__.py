from smapctl.cli import main

main()
