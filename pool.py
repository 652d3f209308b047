import asyncio, aiohttp, os, sys, json, time
ALICE=os.environ["ALICE"]; ADMIN=os.environ["ADMIN"]; base=sys.argv[1]
async def main():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        async def g(path, key):
            async with s.get(base+path, headers={"Authorization":f"Bearer {key}"}) as r: await r.read(); return r.status
        t=time.time()
        res=await asyncio.gather(*[g(p,k) for i in range(40) for p,k in (("/api/usage",ADMIN),("/api/keys",ALICE),("/api/admin/accounts",ADMIN),(f"/v1/organization/usage/completions?start_time={int(time.time())-86400*7}",ADMIN))])
        import collections; print(collections.Counter(res), "%.2fs"%(time.time()-t))
asyncio.run(main())
