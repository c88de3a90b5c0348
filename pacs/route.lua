-- KOA-Serve routing rule for Orthanc: every stored projection radiograph goes to the gateway.
--
-- Only CR, DX and RG images are sent; results (Structured Reports, Secondary Captures), presentation
-- states and documents never are, so the gateway's own results cannot loop back to it. The gateway
-- applies the same rule again (gateway/screen.py).
--
-- Each instance is sent by an asynchronous Orthanc job (POST /modalities/koaserve/store), so storing
-- does not wait for the gateway. A job that fails (the gateway is down) stays in Orthanc's job list
-- as a failure and is resubmitted when the gateway is known to be back: by OnJobSuccess below, as
-- soon as any later routing job succeeds, and by `python -m pacs start` (make pacs) once the gateway
-- listens (pacs.resubmit_failed_routing). Orthanc 1.10's Lua has no timer, so nothing retries while
-- no new image arrives and nobody starts the gateway.

local GATEWAY = 'koaserve'          -- the DicomModalities entry of the gateway (pacs/orthanc.json)
local MODALITIES = { CR = true, DX = true, RG = true }
local NEVER = {
  '1.2.840.10008.5.1.4.1.1.88.',    -- Structured Reports (and key objects)
  '1.2.840.10008.5.1.4.1.1.7',      -- Secondary Capture, single and multi-frame
  '1.2.840.10008.5.1.4.1.1.11.',    -- presentation states
  '1.2.840.10008.5.1.4.1.1.104.',   -- encapsulated documents
}

local function is_radiograph(tags)
  local sop_class = tags['SOPClassUID'] or ''
  for _, prefix in ipairs(NEVER) do
    if string.sub(sop_class, 1, string.len(prefix)) == prefix then
      return false
    end
  end
  return MODALITIES[string.upper(tags['Modality'] or '')] == true
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if is_radiograph(tags) then
    local body = DumpJson({ Resources = { instanceId }, Asynchronous = true, Priority = 0 })
    RestApiPost('/modalities/' .. GATEWAY .. '/store', body)
  end
end

local function is_routing(job)
  return job['Type'] == 'DicomModalityStore' and job['Content']['RemoteAet'] == 'KOASERVE'
end

function OnJobFailure(jobId)
  if is_routing(ParseJson(RestApiGet('/jobs/' .. jobId))) then
    print('routing job ' .. jobId .. ' to the KOA-Serve gateway failed (is it running?); it is resubmitted ' ..
          'when a later routing job succeeds, or by python -m pacs start')
  end
end

function OnJobSuccess(jobId)
  if not is_routing(ParseJson(RestApiGet('/jobs/' .. jobId))) then
    return
  end
  -- The gateway answers again: send it what failed while it was away.
  for _, job in ipairs(ParseJson(RestApiGet('/jobs?expand'))) do
    if job['State'] == 'Failure' and is_routing(job) then
      RestApiPost('/jobs/' .. job['ID'] .. '/resubmit', '')
      print('resubmitted routing job ' .. job['ID'])
    end
  end
end
