module llm2llm.io/testcluster/pause

go 1.22
