from pgconcord.cli import main

main()
