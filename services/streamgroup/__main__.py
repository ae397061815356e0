from streamgroup.cli import main

main()
